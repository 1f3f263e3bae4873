//! The sandfleet command: worker, gateway, enqueue, replay, results, dlq, topology, demo.
