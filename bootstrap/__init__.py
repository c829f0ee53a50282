"""How a gateway or worker process starts: the settings groups they share, its name, its Redis
connection, its telemetry and its signals."""
