"""Helpers shared by the test suite: real servers, clients and fronts."""
