"""Beyond one box (DESIGN.md §7): edges that pull streams over WHEP, a Redis registry of
nodes and streams, and placement of viewers by 307 redirect."""
