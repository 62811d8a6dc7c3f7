"""Model rollout: canary replica sets, their traffic split, state, judge and shadow checks."""
