"""Several hospitals train one head under a joint (threshold) CKKS key: no one party decrypts."""
