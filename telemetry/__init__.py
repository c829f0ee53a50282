"""What a process tells its operators: log lines, Prometheus metrics (a page and OTLP), traces, and
the health-probe service names. `Telemetry.start` (in `process_telemetry`) is the one call a process
makes for all of it."""
