"""The model on a local web page."""

from __future__ import annotations

from . import command, flag


@command(
    "serve",
    "a local web page: upload a head CT (zip or DICOM files), get the model's report and CSVs",
    flag("--model", required=True, help="model bundle folder (written by `export`)"),
    flag("--host", default="127.0.0.1", help="address to listen on (default loopback: this computer only)"),
    flag("--port", type=int, default=8000),
    flag("--jobs", default=None, help="folder of the jobs, one subfolder per upload (default: a new temp folder)"),
    flag("--max-upload-mb", type=int, default=None, help="largest upload accepted (default 2048)"),
)
def serve(args):
    from dataclasses import replace

    from ..serve import app, uploads

    limits = uploads.Limits()
    if args.max_upload_mb is not None:
        limits = replace(limits, max_upload_bytes=args.max_upload_mb * uploads.MiB)
    app.serve(args.model, host=args.host, port=args.port, jobs_dir=args.jobs, limits=limits)
