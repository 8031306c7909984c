"""What the master shows: health probes, /status, and the Prometheus metrics."""
