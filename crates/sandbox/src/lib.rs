//! sandfleet executors: script generator, local and Kubernetes Job executors, failure classification.
