"""The tokenizers, the masked-token transformer and the emotion classifier: pure nn.Modules."""
