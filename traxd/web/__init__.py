"""The status page at / on metrics_address (see traxd.web.app)."""
