"""Graph passes. Each module holds one rewrite: a pure function
``(module, sites, options, context) -> module`` (``context`` is
``bnrewrite.api.RewriteContext``: the capture, example inputs and transform keyword options). Passes never import each other; shared graph
helpers live in ``bnrewrite.capture`` and ``bnrewrite.sites``."""
