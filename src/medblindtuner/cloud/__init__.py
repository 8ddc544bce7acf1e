"""The cloud (untrusted compute): trains and scores on ciphertexts with a public bundle only."""
