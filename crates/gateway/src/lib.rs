//! sandfleet's CI webhook gateway (GitHub, GitLab) and task API.
