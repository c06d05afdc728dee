"""PyTorch adapter: capture (torch.fx), analysis, geometry and rewrite of nn.Module classifiers."""
