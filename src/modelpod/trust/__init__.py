"""Trust: pod and image signatures (DSSE + in-toto), the verification policy, encrypted weights."""
