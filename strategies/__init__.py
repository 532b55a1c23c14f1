"""hetfed's strategies, one method a file over :class:`strategies.base.LoRAStrategy`."""
