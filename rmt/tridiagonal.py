"""Placeholder: being written (remove this line when implemented)."""


def sample_spiked_goe_top(*args, **kwargs):
    raise NotImplementedError("sample_spiked_goe_top")
