"""Process plumbing around a role: supervision, reload, systemd, metrics, admin, logs."""
