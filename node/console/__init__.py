"""The operations console: a FastAPI app (JSON API under ``/api/v1``, Jinja2 + htmx pages) served by
uvicorn in a thread of ``dicom-node serve``, with users, roles, API tokens and an audit log in the
store.  See docs/console.md.
"""
