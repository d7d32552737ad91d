// dicom-node console: the little script the pages need (no inline scripts: the CSP forbids them).
// A form with data-confirm="question" asks before it is sent.
document.addEventListener("submit", function (e) {
  var q = e.target && e.target.dataset ? e.target.dataset.confirm : null;
  if (q && !window.confirm(q)) { e.preventDefault(); }
}, true);
