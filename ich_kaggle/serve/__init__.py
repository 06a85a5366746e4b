"""A local web page around `infer`: upload a head CT (a zip or DICOM files), watch it run, read the report.

`app` holds the routes and the page, `jobs` the one-at-a-time queue of uploads, `uploads` what is accepted from a
browser and how (streamed into the job's folder, zips checked before they are opened)."""
