"""Low precision as Flower building blocks: the message protocol and its Flower adapter.

``protocol`` names every record key and message layout the ServerApp and ClientApp share;
``wire`` turns state dicts into quantized ``ArrayRecord``s and back. The numerics themselves
(``quantization``) do not import Flower.
"""
