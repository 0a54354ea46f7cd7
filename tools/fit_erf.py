import numpy as np, math
erf = np.vectorize(math.erf); erfc=np.vectorize(math.erfc)
def cheb(a,b,n=4000): k=np.arange(n); return (a+b)/2+(b-a)/2*np.cos(np.pi*(k+0.5)/n)
# small: erf(x)/x = P(x^2), x in [0,B]
B=0.9
for deg in (5,6,7):
    x=cheb(0,B); y=erf(x)/np.where(x==0,1,x)
    c=np.polynomial.polynomial.polyfit(x*x,y,deg)
    xs=np.linspace(1e-6,B,200001).astype(np.float32)
    p=np.zeros_like(xs); z=(xs*xs).astype(np.float32)
    for ci in c[::-1]: p=(p*z+np.float32(ci)).astype(np.float32)
    r=(xs*p).astype(np.float32); t=erf(xs.astype(np.float64))
    print('small',deg,np.max(np.abs(r-t)/t)/2**-24, c.tolist() if deg==5 else '')
# large: erfc(x)*exp(x^2) = R(u), u=1/x, x in [B,4]
for deg in (8,9,10,11):
    x=cheb(B,4.0); u=1/x; y=erfc(x)*np.exp(x*x)
    c=np.polynomial.polynomial.polyfit(u,y,deg)
    xs=np.linspace(B,4.0,200001).astype(np.float32)
    uu=(np.float32(1)/xs).astype(np.float32); p=np.zeros_like(xs)
    for ci in c[::-1]: p=(p*uu+np.float32(ci)).astype(np.float32)
    e=np.exp(-(xs*xs).astype(np.float32).astype(np.float64)).astype(np.float32)
    r=(np.float32(1)-e*p).astype(np.float32); t=erf(xs.astype(np.float64))
    print('large',deg,np.max(np.abs(r-t)/t)/2**-24, c.tolist() if deg==8 else '')
