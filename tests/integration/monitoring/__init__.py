"""Monitoring service tests against real servers (a package, so the tests share helpers from conftest)."""
