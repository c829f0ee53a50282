"""The grpc.health.v1 service names Kubernetes' probes ask gateways and workers for: one contract
for both processes and the manifests in deploy/."""

LIVENESS = "liveness"  # the process still works; the kubelet restarts it when this fails
READINESS = "readiness"  # it should be given work now
