"""Tests of deploy/ helpers against real servers."""
