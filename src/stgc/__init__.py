"""STGC: Solving Token Gradient Conflict in Mixture-of-Experts vision-language models."""
