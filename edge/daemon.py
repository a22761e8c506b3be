def main() -> int:
    raise SystemExit("edge-daemon: not built yet")
