"""
Tests of the acme_filters package.
"""
