"""A page's stages, one module each, run in order by ``agent.stages.sequence`` over one typed state
(``agent.stages.state``): plan, pools, draft, check, retry, fix, assemble."""
