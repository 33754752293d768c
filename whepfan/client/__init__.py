"""whepfan's client tools: a WHIP publisher of a synthetic stream (``whepfan publish``,
:class:`~whepfan.client.publisher.Publisher`) and a WHEP load tester (``whepfan loadtest``,
:mod:`whepfan.client.loadtest`), built on whepfan's own protocol layer and compiled core."""
