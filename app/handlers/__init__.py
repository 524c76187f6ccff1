"""Handlers of the tabs: methods that take plain values and return the outputs, testable without a page."""
