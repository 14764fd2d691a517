"""Tenants: per-tenant students trained continuously on the augmented stream by Ray Train."""
