"""Crash and recovery tests: real worker processes, real PostgreSQL, real SIGKILL."""
