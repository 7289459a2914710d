"""Tools around an exported folder: `qcompiler inspect` (`inspect`) and the Netron view / screenshot
(`netron_view`)."""
