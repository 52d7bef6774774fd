"""An e-commerce API wired with every block of ``resilient``: see ``app.py``.

``python -m examples.ecommerce`` serves it (with its payment provider) on embedded
defaults; ``python -m examples.ecommerce.demo`` walks through what each block does.
"""
