

def test_every_public_name_is_importable():
    import runtime.backends as backends

    missing = [name for name in backends.__all__ if not hasattr(backends, name)]
    assert not missing, f"runtime.backends.__all__ names what it does not define: {missing}"
