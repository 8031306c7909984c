"""The settings model and where each value comes from: flags, env, files, profiles.

Runs in the master only: workers get plain values over the channel, not pydantic."""
