"""Residency: chunk KV tiers (device pool -> CPU -> disk) and the policy that moves it."""
