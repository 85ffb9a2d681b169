"""Candidate features, the LightGBM LambdaRank re-ranker, and explanations (KG paths, feature contributions,
modality weights) with text/JSON/HTML reports."""
