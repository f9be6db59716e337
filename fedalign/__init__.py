"""fedalign: federated domain alignment on Flower (Flower-free core)."""
