"""A static HTML viewer for an attribution graph: one file, opens from disk, no server, no network.

Laid out by layer (rows: embeddings at the bottom, logits at the top) and token position (columns); a
cell's nodes sit side by side. Edges are drawn blue (positive direct effect) or red (negative), their
width by |effect|. Clicking a node lists its strongest inputs and outputs; a feature node whose layer has
a dashboard links to its page there. The graph's JSON is embedded; the script draws it into an SVG.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from sae_core.publish import atomic_write_bytes

STYLE = """
body{font:13px system-ui,sans-serif;margin:0;display:flex;height:100vh}
#main{flex:1;overflow:auto}#side{width:320px;border-left:1px solid #ccc;padding:8px;overflow:auto}
svg text{font-size:10px}.node{cursor:pointer;stroke:#333;stroke-width:.5}
.embedding{fill:#bbb}.feature{fill:#f4b942}.error{fill:#9aa;}.logit{fill:#6ab04c}
.sel{stroke:#000;stroke-width:2.5}line.e{stroke-opacity:.45}line.dim{stroke-opacity:.05}
h1{font-size:15px;margin:6px 0}td{padding:1px 4px}
"""

SCRIPT = r"""
(function(){
const g=JSON.parse(document.getElementById('graph').textContent);
const NS='http://www.w3.org/2000/svg';
const T=g.tokens.length, layers=[...new Set(g.nodes.map(n=>n.layer))].sort((a,b)=>a-b);
const cellW=Math.max(60,Math.min(110,1400/T)),rowH=70,padL=100,padB=40;
const cells={};
g.nodes.forEach(n=>{const k=n.layer+':'+n.position;(cells[k]=cells[k]||[]).push(n);});
const pos={};
Object.values(cells).forEach(list=>{list.forEach((n,i)=>{
  const row=layers.indexOf(n.layer);
  pos[n.id]={x:padL+n.position*cellW+12+(i%8)*12,y:padB+(layers.length-1-row)*rowH+20+Math.floor(i/8)*12};});});
const W=padL+T*cellW+20,H=padB+layers.length*rowH+30;
const svg=document.createElementNS(NS,'svg');svg.setAttribute('width',W);svg.setAttribute('height',H);
svg.id='canvas';
function el(tag,attrs,text){const e=document.createElementNS(NS,tag);
  for(const k in attrs)e.setAttribute(k,attrs[k]);if(text!==undefined)e.textContent=text;return e;}
layers.forEach((l,row)=>{const y=padB+(layers.length-1-row)*rowH+24;
  const name=l<0?'embeddings':(g.nodes.some(n=>n.layer===l&&n.kind==='logit')?'logits':'layer '+l);
  svg.appendChild(el('text',{x:8,y:y},name));});
g.tokens.forEach((t,i)=>svg.appendChild(el('text',{x:padL+i*cellW+4,y:H-8},JSON.stringify(t))));
const maxW=Math.max(1e-12,...g.links.map(e=>Math.abs(e.weight)));
const lines=[];
g.links.forEach(e=>{const a=pos[e.source],b=pos[e.target];if(!a||!b)return;
  const line=el('line',{x1:a.x,y1:a.y,x2:b.x,y2:b.y,class:'e','stroke-width':0.5+3*Math.abs(e.weight)/maxW,
    stroke:e.weight>=0?'#1f6fd0':'#d03a1f'});line.dataset.s=e.source;line.dataset.t=e.target;
  svg.appendChild(line);lines.push(line);});
const byId={};g.nodes.forEach(n=>byId[n.id]=n);
g.nodes.forEach(n=>{const p=pos[n.id];
  const c=el('circle',{cx:p.x,cy:p.y,r:n.kind==='feature'?5:4,class:'node '+n.kind,id:'n-'+n.id});
  c.appendChild(el('title',{},label(n)));c.addEventListener('click',()=>select(n.id));
  if(n.dashboard){const a=el('a',{href:n.dashboard,class:'dash'});a.appendChild(c);svg.appendChild(a);}
  else svg.appendChild(c);});
document.getElementById('main').appendChild(svg);
function label(n){
  if(n.kind==='feature')return 'L'+n.layer+' pos '+n.position+' feature '+n.feature+' act '+n.activation.toFixed(3);
  if(n.kind==='logit')return 'logit '+JSON.stringify(n.token)+' p='+n.probability.toFixed(3);
  if(n.kind==='error')return 'error L'+n.layer+' pos '+n.position;
  return 'token '+JSON.stringify(n.token)+' pos '+n.position;}
function select(id){
  document.querySelectorAll('.sel').forEach(e=>e.classList.remove('sel'));
  document.getElementById('n-'+id).classList.add('sel');
  lines.forEach(l=>l.classList.toggle('dim',l.dataset.s!==id&&l.dataset.t!==id));
  const ins=g.links.filter(e=>e.target===id).sort((a,b)=>Math.abs(b.weight)-Math.abs(a.weight)).slice(0,12);
  const outs=g.links.filter(e=>e.source===id).sort((a,b)=>Math.abs(b.weight)-Math.abs(a.weight)).slice(0,12);
  const n=byId[id];const side=document.getElementById('detail');side.textContent='';
  const h=document.createElement('h1');h.textContent=label(n);side.appendChild(h);
  if(n.dashboard){const a=document.createElement('a');a.href=n.dashboard;a.textContent='dashboard page';side.appendChild(a);}
  [['inputs',ins,'source'],['outputs',outs,'target']].forEach(([name,list,key])=>{
    const t=document.createElement('table');const cap=document.createElement('caption');cap.textContent=name;
    t.appendChild(cap);list.forEach(e=>{const r=t.insertRow();r.insertCell().textContent=label(byId[e[key]]);
      r.insertCell().textContent=e.weight.toFixed(4);});side.appendChild(t);});}
document.getElementById('summary').textContent=g.nodes.length+' nodes, '+g.links.length+' edges; prompt '
  +JSON.stringify(g.prompt);
document.body.dataset.ready='1';
})();
"""


def viewer_html(graph: dict[str, Any], title: str = "attribution graph") -> str:
    data = json.dumps(graph).replace("</", "<\\/")  # no "</script>" inside the embedded JSON
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f'<div id="main"><p id="summary"></p></div><div id="side"><div id="detail">click a node</div></div>'
        f'<script type="application/json" id="graph">{data}</script><script>{SCRIPT}</script></body></html>'
    )


def write_viewer(graph: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, viewer_html(graph, f"attribution graph: {graph.get('prompt', '')}").encode())
    return path
