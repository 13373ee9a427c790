"""Parts catalog, order placement from wear alerts, order store and lifecycle, REST API and web page."""
