"""Functions for the pool example: each takes the payload as bytes and returns bytes or str."""

import hashlib
import json


def echo(payload):
    return payload


def sha256(payload):
    return hashlib.sha256(payload).hexdigest()


def word_count(payload):
    words = payload.decode("utf-8").split()
    return json.dumps({"words": len(words), "distinct": len(set(words))})
