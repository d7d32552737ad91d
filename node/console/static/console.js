// dicom-node console: the little script the pages need (no inline scripts: the CSP forbids them).
// A form with data-confirm="question" asks before it is sent.
document.addEventListener("submit", function (e) {
  var q = e.target && e.target.dataset ? e.target.dataset.confirm : null;
  if (q && !window.confirm(q)) { e.preventDefault(); }
}, true);

// rules page: a click on an issue puts the cursor on its line (and column) in the text area
document.addEventListener("click", function (e) {
  var el = e.target && e.target.closest ? e.target.closest(".issue[data-line]") : null;
  var ta = document.getElementById("rules-text");
  if (!el || !ta) { return; }
  var line = +el.dataset.line - (+ta.dataset.firstLine || 1), lines = ta.value.split("\n"), pos = 0;
  for (var k = 0; k < line && k < lines.length; k++) { pos += lines[k].length + 1; }
  pos += Math.max(0, (+el.dataset.column || 1) - 1);
  ta.focus();
  ta.setSelectionRange(pos, pos);
});
