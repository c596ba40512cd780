"""A hospital's own images: a DICOM tree with a labels CSV, or a folder of PNG/JPEG per class.

The site config (``client/site/config.py``) embeds one
:data:`~consilia.client.site.data_sources.config.DataSourceConfig` as its ``data`` field.
:func:`~consilia.client.site.data_sources.loading.scan_site_data` checks a source without
building tensors (``--check``); :func:`~consilia.client.site.data_sources.loading.load_site_data`
decodes, resizes and caches every labelled image and returns the
:class:`~consilia.client.site.data_sources.dataset.SiteDataset` plus a
:class:`~consilia.client.site.data_sources.report.DataReport` that lists every file it could
not use and why.

Modules: ``config`` (the source settings), ``files`` (walking a root, resolving labels),
``dicom_tree`` (DICOM + labels CSV), ``image_folder`` (pictures per class folder),
``preprocess`` (resize, channels), ``cache`` (the decoded-image cache), ``report``, ``dataset``
and ``loading`` (the entry points).

Rules:

* Source files are only ever opened read-only; nothing is written under the data root.
* Preprocessed images are cached in ``cache_dir`` under the SHA-256 of the file's bytes plus the
  preprocessing parameters (image size, channels, frame policy, pipeline/decoder versions), so
  a second load decodes nothing, and an edited file is decoded again. Skips are cached too.
* No file is dropped silently: unusable files, labels outside the class list, files without a
  label and CSV rows without a file all appear in the report; ``fl-client --check`` writes the
  full report, every file with its reason, to ``<state_dir>/data-report.json``.
* Decoding is bounded: a DICOM file whose decoded pixel data would exceed
  ``data.max_decoded_megabytes`` (default 512) is skipped before anything is decoded (see
  :mod:`consilia.common.data.dicom.size_guard`).
* Images are resized to ``image_size`` x ``image_size`` (antialiased bilinear, the same
  resize as :func:`consilia.common.data.datasets.base.resize_images`) and converted to the run's
  channel count (grey -> RGB by copying; RGB -> grey with ITU-R BT.601 luma weights).
"""

__all__: list[str] = []
