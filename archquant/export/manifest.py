"""Former home of the export manifest, now ``archquant.utils.manifest``; kept for importers not yet moved."""

from archquant.utils.manifest import (  # noqa: F401
    MANIFEST_NAME,
    ManifestError,
    build_manifest,
    read_manifest,
    verify_file,
    verify_manifest,
    write_manifest,
)
