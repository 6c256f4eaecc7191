"""Tasks that exercise HOMER: the passkey retrieval task of the shipped model (`passkey.py`)."""
