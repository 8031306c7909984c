"""The master process: binds the sockets once and keeps the workers healthy.

`arbiter` runs the lifecycle; `workers` is its handle on one process; `rollout`
replaces workers while serving; `policy` holds the pure decisions both take."""
