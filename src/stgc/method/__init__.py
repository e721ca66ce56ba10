"""Token-gradient conflicts: exact cosines between each token's expert gradient and the experts' sum."""

from stgc.method.cosine import CosinePath, cosine_from_terms, linear_gradient_terms, token_gradient_cosine

__all__ = ["CosinePath", "cosine_from_terms", "linear_gradient_terms", "token_gradient_cosine"]
