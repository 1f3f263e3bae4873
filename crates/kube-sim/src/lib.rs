//! A fake Kubernetes API server with a simulated Job controller and kubelet, for sandfleet's tests.
