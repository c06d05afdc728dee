"""Framework adapters: each finds the head of a model (-> HeadPlan) and rewrites it."""
