"""What runs the models: the Llama-family runtime over a static KV cache, the static-shape steps
(compiled on CPU, CUDA graphs on a GPU), the sorted draft, the proposer and the verifier, sampling
and the lossless rejection rule."""
