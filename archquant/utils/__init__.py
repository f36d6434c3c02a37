"""Small shared helpers (atomic file writes, device/version info, folder manifests)."""
